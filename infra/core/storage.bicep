// Storage account for the Functions host (identity-based, shared keys off), the Flex Consumption
// deployment container, and every queue and table the router uses.
//
// The queue and table lists mirror core/names.py (ALL_QUEUES, TABLES); tests/unit/test_infra.py fails
// when they drift apart.

@description('Storage account name (3-24 lowercase letters and digits).')
@minLength(3)
@maxLength(24)
param name string

param location string
param tags object = {}

@description('Blob container that holds the deployment package (Flex Consumption).')
param deploymentContainerName string

@description('Prefix of the router\'s table names (TABLE_PREFIX).')
param tablePrefix string

// core/names.py ALL_QUEUES: each work queue and its "-poison" queue.
var queueNames = [
  'inbound-mail'
  'outbound-mail'
  'mailbox-sync'
  'inbound-mail-poison'
  'outbound-mail-poison'
  'mailbox-sync-poison'
]

// core/names.py TABLES (logical names; the real name is tablePrefix + logical name).
var tableNames = [
  'Mailboxes'
  'OrgSettings'
  'Subscriptions'
  'DeltaState'
  'Processed'
  'MailboxStatus'
  'Decisions'
  'DecisionIndex'
  'Outbound'
  'PoisonLog'
  'Leases'
]

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    allowSharedKeyAccess: false // identity only: the app, the host and deployments use Entra ID
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for queueName in queueNames: {
    parent: queueService
    name: queueName
  }
]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [
  for tableName in tableNames: {
    parent: tableService
    name: '${tablePrefix}${tableName}'
  }
]

output name string = account.name
output id string = account.id
output blobEndpoint string = account.properties.primaryEndpoints.blob
output queueEndpoint string = account.properties.primaryEndpoints.queue
output tableEndpoint string = account.properties.primaryEndpoints.table
output deploymentContainerName string = deploymentContainer.name
