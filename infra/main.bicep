// Email Router for Dynamics 365: everything the Function App needs in one resource group.
//
//   Flex Consumption plan (FC1, Linux) + Function App (Python 3.11)        app/api.bicep
//   user-assigned managed identity (storage, Key Vault, App Insights)     this file
//   Storage account: host storage, deployment container, queues, tables   core/storage.bicep
//   Key Vault (RBAC mode) with the app registration secret(s)             core/keyvault.bicep
//   Log Analytics + Application Insights (Entra ID auth only), poison alert core/monitoring.bicep
//   role assignments for the identity and for the operator                app/rbac.bicep
//   app settings (after the role assignments)                             app/appsettings.bicep
//
// Used by `azd up` (azure.yaml, main.parameters.json, hooks in infra/hooks/azd_hooks.py) and by
// `az deployment group create`. No secret is written into this template or returned as an output.
// Recommended credential: the user-assigned identity as a federated identity credential on the app
// registration (appCredential = 'managedIdentity'): no secret exists anywhere. The fallback is a client
// secret passed as a secure parameter, stored in Key Vault and read through a Key Vault reference.
// The Bicep CLI could not be run where this was written: run `az bicep build --file infra/main.bicep`
// before deploying (docs/deploy.md).

targetScope = 'resourceGroup'

metadata description = 'Email Router for Dynamics 365 on Azure Functions Flex Consumption'

// ---------------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('Name of the environment (azd: AZURE_ENV_NAME). Seeds the unique suffix of every resource name.')
param environmentName string

@minLength(1)
@metadata({
  azd: {
    type: 'location'
  }
})
@description('Region of every resource; it must offer Flex Consumption (az functionapp list-flexconsumption-locations).')
param location string = resourceGroup().location

@description('Extra tags for every resource.')
param tags object = {}

// ---------------------------------------------------------------------------------------------------
// Microsoft Graph (Exchange Online). May be a different tenant from Dataverse.
// ---------------------------------------------------------------------------------------------------

@minLength(1)
@description('Entra tenant id of the Exchange Online organisation (GRAPH_TENANT_ID).')
param graphTenantId string

@minLength(1)
@description('Application (client) id of the app registration used for Microsoft Graph (GRAPH_CLIENT_ID).')
param graphClientId string

@allowed([
  'managedIdentity'
  'clientSecret'
])
@description('How the router signs in to the app registration(s). managedIdentity (recommended): the user-assigned identity is a federated identity credential on the app registration (issuer/subject in the outputs FEDERATED_CREDENTIAL_*; the azd postprovision hook adds it) and no secret exists. clientSecret: graphClientSecret, kept in Key Vault.')
param appCredential string = 'managedIdentity'

@secure()
@description('Client secret of the Graph app registration (appCredential = clientSecret). Written to Key Vault as graph-client-secret; leave empty to put it there yourself.')
param graphClientSecret string = ''

@description('Identity platform host for Graph tokens (GRAPH_AUTHORITY_HOST). Defaults to the current cloud.')
param graphAuthorityHost string = environment().authentication.loginEndpoint

@description('Microsoft Graph base URL (GRAPH_BASE_URL); change only for national clouds.')
param graphBaseUrl string = 'https://graph.microsoft.com/v1.0'

@description('Scope requested for Graph tokens (GRAPH_SCOPE); change only for national clouds.')
param graphScope string = 'https://graph.microsoft.com/.default'

// ---------------------------------------------------------------------------------------------------
// Dataverse (Dynamics 365). Empty tenant/client = the Graph ones (single-tenant, single app).
// ---------------------------------------------------------------------------------------------------

@minLength(1)
@description('Dataverse organisation URL, e.g. https://contoso.crm.dynamics.com (DATAVERSE_URL).')
param dataverseUrl string

@description('Tenant of the Dataverse org when it differs from the Exchange tenant (DATAVERSE_TENANT_ID); empty = graphTenantId.')
param dataverseTenantId string = ''

@description('Client id of a separate Dataverse app registration (DATAVERSE_CLIENT_ID); empty = graphClientId.')
param dataverseClientId string = ''

@description('Application-user pool (DATAVERSE_CLIENT_IDS): comma-separated app (client) ids, each an application user of the org with the router\'s role; empty = dataverseClientId (or graphClientId) alone. The managed identity signs in to each (postprovision adds its federated credential). docs/deploy.md §9 sizes the pool.')
param dataverseClientIds string = ''

@secure()
@description('Client secret of the separate Dataverse app registration (only used when dataverseClientId is set). Written to Key Vault as dataverse-client-secret.')
param dataverseClientSecret string = ''

@description('Full token authority for Dataverse (DATAVERSE_AUTHORITY), e.g. an AD FS authority for Dynamics 365 on-premises; empty = Entra ID.')
param dataverseAuthority string = ''

@description('Scope for Dataverse tokens (DATAVERSE_SCOPE); empty = dataverseUrl + "/.default".')
param dataverseScope string = ''

@description('Dataverse Web API version (DATAVERSE_API_VERSION).')
param dataverseApiVersion string = 'v9.2'

// ---------------------------------------------------------------------------------------------------
// Webhooks. The base URL is computed from the Function App's host name.
// ---------------------------------------------------------------------------------------------------

@secure()
@description('Function key that Graph notification URLs carry as ?code= (WEBHOOK_FUNCTION_KEY). Written to Key Vault as webhook-function-key; register the same value as a host function key after deployment (docs/deploy.md).')
param webhookFunctionKey string = ''

@description('Largest notification body accepted, in bytes (WEBHOOK_MAX_BODY_BYTES).')
param webhookMaxBodyBytes int = 1048576

// ---------------------------------------------------------------------------------------------------
// Router behaviour
// ---------------------------------------------------------------------------------------------------

@minLength(1)
@maxLength(40)
@description('Prefix of every Azure Table the router keeps (TABLE_PREFIX): letters and digits, starting with a letter.')
param tablePrefix string = 'emailrouter'

@description('NCRONTAB (6 fields, seconds first): subscription reconcile (SUBSCRIPTION_RECONCILE_SCHEDULE).')
param subscriptionReconcileSchedule string = '0 */15 * * * *'

@description('NCRONTAB: delta catch-up rounds (DELTA_CATCHUP_SCHEDULE).')
param deltaCatchupSchedule string = '0 */5 * * * *'

@description('NCRONTAB: scan CRM for Pending Send emails (OUTBOUND_SCAN_SCHEDULE).')
param outboundScanSchedule string = '*/15 * * * * *'

@description('NCRONTAB: sync delivery methods from CRM (CRM_SYNC_SCHEDULE).')
param crmSyncSchedule string = '0 */15 * * * *'

@description('NCRONTAB: CRM Test & Enable requests and the mailbox health probe sweep (MAILBOX_HEALTH_SCHEDULE).')
param mailboxHealthSchedule string = '*/30 * * * * *'

@allowed([
  'DEBUG'
  'INFO'
  'WARNING'
  'ERROR'
])
@description('Log level of the router\'s own loggers (LOG_LEVEL).')
param logLevel string = 'INFO'

// ---------------------------------------------------------------------------------------------------
// Scale (Flex Consumption)
// ---------------------------------------------------------------------------------------------------

@allowed([
  512
  2048
  4096
])
@description('Memory of each Flex Consumption instance, in MB.')
param instanceMemoryMB int = 2048

// Per-instance queue concurrency in Azure (app settings AzureFunctionsJobHost__extensions__queues__*, which
// override host.json; host.json keeps the Functions defaults 16 + 8 for the single-instance local stack, where
// they measured faster: docs/deploy.md §9). Each instance runs up to batchSize + newBatchThreshold messages.
@minValue(1)
@maxValue(32)
@description('Queue messages each instance fetches at once (host.json extensions.queues.batchSize, overridden in Azure).')
param queueBatchSize int = 4

@minValue(0)
@description('Fetch again when in-flight messages drop to this (host.json extensions.queues.newBatchThreshold, overridden in Azure).')
param queueNewBatchThreshold int = 2

// Default derived from the downstream limits and the queue concurrency above (docs/deploy.md "Scaling", checked
// by tests/unit/test_infra.py): every queue-triggered instance runs up to queueBatchSize + queueNewBatchThreshold
// = 4 + 2 = 6 messages at once, each with at most one Dataverse request in flight; the timers that read
// Dataverse (outbound scan, CRM sync, health probe) add one each, plus one for an operator's CLI = 4.
// Dataverse allows 52 concurrent requests per application user (per web server, strict reading: one); with
// one application user (the pool spreads requests evenly, so K users allow K x 52):
//   (maximumInstanceCount - httpAlwaysReady) x 6 + 4 <= 52   =>   (9 - 1) x 6 + 4 = 52.
// 9 is also the number of scale groups (the HTTP group, 3 queue functions, 5 timers), so every group can
// have an instance at the same time. Raise it only together with more application users or a lower
// per-instance concurrency.
@minValue(1)
@maxValue(1000)
@description('Upper bound of Flex Consumption instances for the whole app (docs/deploy.md "Scaling" has the arithmetic).')
param maximumInstanceCount int = 9

@minValue(0)
@maxValue(10)
@description('Always-ready instances for the HTTP scale group (Graph notifications must be answered within seconds; 0 = scale to zero and accept cold starts).')
param httpAlwaysReady int = 1

@description('Turn on Key Vault purge protection (on by default; cannot be turned off again; a purge-protected vault cannot be purged before its retention ends, so `azd down --purge` leaves it and a redeployment needs a new environment name).')
param keyVaultPurgeProtection bool = true

// ---------------------------------------------------------------------------------------------------
// Operators and alerts
// ---------------------------------------------------------------------------------------------------

@description('Object id of the operator (user or group) who runs the emailrouter CLI, Storage Explorer and secret rotation: gets queue, table and Key Vault secret data roles. Defaults to whoever deploys; empty = nobody.')
param principalId string = deployer().objectId

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
@description('Type of principalId.')
param principalType string = 'User'

@description('E-mail address alerted when a message lands in a poison queue; empty = the alert fires in the portal only.')
param alertEmail string = ''

// ---------------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------------

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName, location))
var allTags = union(tags, { 'azd-env-name': environmentName })
var serviceName = 'api'

var functionAppName = '${abbrs.webSitesFunctions}emailrouter-${resourceToken}'
var useClientSecret = appCredential == 'clientSecret'
// The token-exchange audience of the current cloud (Entra: api://AzureADTokenExchange, ...USGov, ...China).
var federatedTokenAudiences = {
  AzureCloud: 'api://AzureADTokenExchange'
  AzureUSGovernment: 'api://AzureADTokenExchangeUSGov'
  AzureChinaCloud: 'api://AzureADTokenExchangeChina'
}
var federatedTokenAudience = contains(federatedTokenAudiences, environment().name)
  ? federatedTokenAudiences[environment().name]
  : 'api://AzureADTokenExchange'
var deploymentContainerName = 'app-package-${resourceToken}'

// Key Vault secret names; the values are never in this template.
var secretNames = {
  graphClientSecret: 'graph-client-secret'
  dataverseClientSecret: 'dataverse-client-secret'
  webhookFunctionKey: 'webhook-function-key'
}

// ---------------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------------

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${abbrs.managedIdentityUserAssignedIdentities}emailrouter-${resourceToken}'
  location: location
  tags: allTags
}

module monitoring 'core/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    workspaceName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    appInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: allTags
    alertEmail: alertEmail
  }
}

module storage 'core/storage.bicep' = {
  name: 'storage'
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: allTags
    deploymentContainerName: deploymentContainerName
    tablePrefix: tablePrefix
  }
}

module keyVault 'core/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: '${abbrs.keyVaultVaults}${resourceToken}'
    location: location
    tags: allTags
    purgeProtection: keyVaultPurgeProtection
    secretNames: secretNames
    graphClientSecret: useClientSecret ? graphClientSecret : ''
    dataverseClientSecret: useClientSecret && !empty(dataverseClientId) ? dataverseClientSecret : ''
    webhookFunctionKey: webhookFunctionKey
  }
}

module api 'app/api.bicep' = {
  name: 'api'
  params: {
    name: functionAppName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: allTags
    serviceName: serviceName
    identityId: identity.id
    deploymentStorageBlobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: deploymentContainerName
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    httpAlwaysReady: httpAlwaysReady
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  params: {
    principalId: identity.properties.principalId
    operatorPrincipalId: principalId
    operatorPrincipalType: principalType
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

// The Functions host serves HTTP functions under host.json "routePrefix" ("api").
var webhookBaseUrl = 'https://${api.outputs.defaultHostName}/api'

module appSettings 'app/appsettings.bicep' = {
  name: 'appsettings'
  params: {
    functionAppName: api.outputs.name
    identityClientId: identity.properties.clientId
    storageBlobEndpoint: storage.outputs.blobEndpoint
    storageQueueEndpoint: storage.outputs.queueEndpoint
    storageTableEndpoint: storage.outputs.tableEndpoint
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    keyVaultUri: keyVault.outputs.uri
    secretNames: secretNames
    federatedTokenAudience: federatedTokenAudience
    tablePrefix: tablePrefix
    graphTenantId: graphTenantId
    graphClientId: graphClientId
    clientSecretInUse: useClientSecret
    graphAuthorityHost: graphAuthorityHost
    graphBaseUrl: graphBaseUrl
    graphScope: graphScope
    dataverseUrl: dataverseUrl
    dataverseTenantId: dataverseTenantId
    dataverseClientId: dataverseClientId
    dataverseClientIds: dataverseClientIds
    dataverseAuthority: dataverseAuthority
    dataverseScope: dataverseScope
    dataverseApiVersion: dataverseApiVersion
    webhookBaseUrl: webhookBaseUrl
    webhookMaxBodyBytes: webhookMaxBodyBytes
    subscriptionReconcileSchedule: subscriptionReconcileSchedule
    deltaCatchupSchedule: deltaCatchupSchedule
    outboundScanSchedule: outboundScanSchedule
    crmSyncSchedule: crmSyncSchedule
    mailboxHealthSchedule: mailboxHealthSchedule
    logLevel: logLevel
    queueBatchSize: queueBatchSize
    queueNewBatchThreshold: queueNewBatchThreshold
  }
  // Key Vault references and identity-based storage resolve only once the roles exist.
  dependsOn: [
    rbac
  ]
}

// ---------------------------------------------------------------------------------------------------
// Outputs (azd stores them in the environment). Names and URLs only, never secrets.
// ---------------------------------------------------------------------------------------------------

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = resourceGroup().name
output AZURE_FUNCTION_APP_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output AZURE_FUNCTION_APP_URL string = 'https://${api.outputs.defaultHostName}'
output WEBHOOK_BASE_URL string = webhookBaseUrl
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_URI string = keyVault.outputs.uri
output AZURE_USER_ASSIGNED_IDENTITY_CLIENT_ID string = identity.properties.clientId
output AZURE_USER_ASSIGNED_IDENTITY_PRINCIPAL_ID string = identity.properties.principalId
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.appInsightsName
// For the emailrouter CLI against this deployment (docs/deploy.md "The CLI against your deployment").
output AZURE_STORAGE_QUEUE_ENDPOINT string = storage.outputs.queueEndpoint
output AZURE_STORAGE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output TABLE_PREFIX string = tablePrefix
// The federated identity credential the app registration needs (appCredential = managedIdentity):
// az ad app federated-credential create --id <app id> --parameters '{"name": "...", "issuer": ..., "subject": ..., "audiences": [...]}'
output EMAILROUTER_APP_CREDENTIAL string = appCredential
output FEDERATED_CREDENTIAL_ISSUER string = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
output FEDERATED_CREDENTIAL_SUBJECT string = identity.properties.principalId
output FEDERATED_TOKEN_AUDIENCE string = federatedTokenAudience
