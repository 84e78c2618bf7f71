// Key Vault in RBAC mode holding the app registration secret(s) and the webhook function key.
// A secret is written only when its (secure) parameter is non-empty, so a re-deployment without the
// value keeps what is in the vault. Values never appear in outputs.

@minLength(3)
@maxLength(24)
param name string

param location string
param tags object = {}

@description('Turn on purge protection (irreversible; on by default: a deleted vault and its secrets stay recoverable for the retention period).')
param purgeProtection bool = true

@description('Names of the secrets: graphClientSecret, dataverseClientSecret, webhookFunctionKey.')
param secretNames object

@secure()
param graphClientSecret string = ''

@secure()
param dataverseClientSecret string = ''

@secure()
param webhookFunctionKey string = ''

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: purgeProtection ? true : null
    // Key Vault references from a Flex Consumption app without VNet integration need a reachable vault;
    // the VNet option (private endpoints, publicNetworkAccess Disabled) is described in docs/deploy.md.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource graphSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(graphClientSecret)) {
  parent: vault
  name: secretNames.graphClientSecret
  properties: {
    value: graphClientSecret
    contentType: 'text/plain'
  }
}

resource dataverseSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(dataverseClientSecret)) {
  parent: vault
  name: secretNames.dataverseClientSecret
  properties: {
    value: dataverseClientSecret
    contentType: 'text/plain'
  }
}

resource webhookKey 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(webhookFunctionKey)) {
  parent: vault
  name: secretNames.webhookFunctionKey
  properties: {
    value: webhookFunctionKey
    contentType: 'text/plain'
  }
}

output name string = vault.name
output id string = vault.id
output uri string = vault.properties.vaultUri
