// The Function App's app settings: every setting the router reads (core/config.py SETTINGS) that
// the deployment decides, plus identity-based host storage and Entra-authenticated App Insights.
// Secrets are Key Vault references resolved with the user-assigned identity
// (keyVaultReferenceIdentity in app/api.bicep), never values. With clientSecretInUse = false (the
// recommended managed identity credential) there is no secret: GRAPH_MANAGED_IDENTITY_CLIENT_ID names the
// identity whose token is the client assertion, and no client secret reference is set (an unresolvable
// reference would only be noise in /api/health).
//
// This resource replaces the whole app-settings collection: a setting added by hand in the portal
// is removed by the next deployment; add it here (or as a parameter) instead.
// tests/unit/test_infra.py reads this file to check that no setting of core/config.py is forgotten.

param functionAppName string

@description('Client id of the user-assigned managed identity.')
param identityClientId string

param storageBlobEndpoint string
param storageQueueEndpoint string
param storageTableEndpoint string
param appInsightsConnectionString string

@description('Key Vault URI with the trailing slash, e.g. https://kv-x.vault.azure.net/')
param keyVaultUri string

@description('Names of the Key Vault secrets: graphClientSecret, dataverseClientSecret, webhookFunctionKey.')
param secretNames object

param tablePrefix string = 'emailrouter'

param graphTenantId string
param graphClientId string

@description('true: the app registration(s) use a client secret from Key Vault; false: the managed identity is their federated credential.')
param clientSecretInUse bool

@description('Audience of the managed identity token used as client assertion (api://AzureADTokenExchange in the public cloud).')
param federatedTokenAudience string

// No defaults: main.bicep passes the current cloud's values (environment()), never a hard-coded host.
param graphAuthorityHost string
param graphBaseUrl string
param graphScope string

param dataverseUrl string
param dataverseTenantId string = ''
param dataverseClientId string = ''
param dataverseClientIds string = ''
param dataverseAuthority string = ''
param dataverseScope string = ''
param dataverseApiVersion string = 'v9.2'

@description('Public base URL of the HTTP functions, e.g. https://func-x.azurewebsites.net/api')
param webhookBaseUrl string
param webhookMaxBodyBytes int = 1048576

param subscriptionReconcileSchedule string = '0 */15 * * * *'
param deltaCatchupSchedule string = '0 */5 * * * *'
param outboundScanSchedule string = '*/15 * * * * *'
param crmSyncSchedule string = '0 */15 * * * *'
param mailboxHealthSchedule string = '*/30 * * * * *'
param logLevel string = 'INFO'

@description('Per-instance queue concurrency (main.bicep queueBatchSize / queueNewBatchThreshold).')
param queueBatchSize int = 4
param queueNewBatchThreshold int = 2

// Versionless references: the app follows the latest secret version after a rotation.
var graphClientSecretRef = '@Microsoft.KeyVault(SecretUri=${keyVaultUri}secrets/${secretNames.graphClientSecret}/)'
var dataverseClientSecretRef = '@Microsoft.KeyVault(SecretUri=${keyVaultUri}secrets/${secretNames.dataverseClientSecret}/)'
var webhookFunctionKeyRef = '@Microsoft.KeyVault(SecretUri=${keyVaultUri}secrets/${secretNames.webhookFunctionKey}/)'

// Functions host: identity-based storage (no connection string, no keys) and App Insights with Entra ID.
var hostSettings = {
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AzureWebJobsStorage__blobServiceUri: storageBlobEndpoint
  AzureWebJobsStorage__queueServiceUri: storageQueueEndpoint
  AzureWebJobsStorage__tableServiceUri: storageTableEndpoint
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  // App settings override host.json: Azure runs fewer messages per instance than the local stack (docs/deploy.md §9).
  AzureFunctionsJobHost__extensions__queues__batchSize: string(queueBatchSize)
  AzureFunctionsJobHost__extensions__queues__newBatchThreshold: string(queueNewBatchThreshold)
}

var graphSettings = {
  GRAPH_TENANT_ID: graphTenantId
  GRAPH_CLIENT_ID: graphClientId
  GRAPH_AUTHORITY_HOST: graphAuthorityHost
  GRAPH_BASE_URL: graphBaseUrl
  GRAPH_SCOPE: graphScope
}

var graphCredentialSettings = clientSecretInUse
  ? {
      GRAPH_CLIENT_SECRET: graphClientSecretRef
    }
  : {
      GRAPH_MANAGED_IDENTITY_CLIENT_ID: identityClientId
      FEDERATED_TOKEN_AUDIENCE: federatedTokenAudience
    }

var dataverseSettings = {
  DATAVERSE_URL: dataverseUrl
  DATAVERSE_TENANT_ID: dataverseTenantId
  DATAVERSE_CLIENT_ID: dataverseClientId
  DATAVERSE_CLIENT_IDS: dataverseClientIds
  DATAVERSE_AUTHORITY: dataverseAuthority
  DATAVERSE_SCOPE: dataverseScope
  DATAVERSE_API_VERSION: dataverseApiVersion
}

// Only a separate Dataverse app registration with a secret has its own; otherwise the router uses the
// Graph app's credential (with the managed identity, add the same federated credential to that app).
var dataverseSecretSettings = clientSecretInUse && !empty(dataverseClientId)
  ? {
      DATAVERSE_CLIENT_SECRET: dataverseClientSecretRef
    }
  : {}

var webhookSettings = {
  WEBHOOK_BASE_URL: webhookBaseUrl
  WEBHOOK_FUNCTION_KEY: webhookFunctionKeyRef
  WEBHOOK_MAX_BODY_BYTES: string(webhookMaxBodyBytes)
}

var routerSettings = {
  TABLE_PREFIX: tablePrefix
  SUBSCRIPTION_RECONCILE_SCHEDULE: subscriptionReconcileSchedule
  DELTA_CATCHUP_SCHEDULE: deltaCatchupSchedule
  OUTBOUND_SCAN_SCHEDULE: outboundScanSchedule
  CRM_SYNC_SCHEDULE: crmSyncSchedule
  MAILBOX_HEALTH_SCHEDULE: mailboxHealthSchedule
  LOG_LEVEL: logLevel
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: union(
    hostSettings,
    graphSettings,
    graphCredentialSettings,
    dataverseSettings,
    dataverseSecretSettings,
    webhookSettings,
    routerSettings
  )
}
