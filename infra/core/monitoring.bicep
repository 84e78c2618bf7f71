// Log Analytics workspace + workspace-based Application Insights with local (key) authentication off:
// telemetry is accepted only with an Entra ID token (the app's managed identity holds Monitoring
// Metrics Publisher, see app/rbac.bicep; the app sets APPLICATIONINSIGHTS_AUTHENTICATION_STRING).

param workspaceName string
param appInsightsName string
param location string
param tags object = {}

@minValue(30)
@maxValue(730)
@description('Days Log Analytics keeps data.')
param retentionInDays int = 30

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

output appInsightsName string = appInsights.name
// Not a credential: with DisableLocalAuth the instrumentation key alone cannot ingest telemetry.
output appInsightsConnectionString string = appInsights.properties.ConnectionString
output workspaceName string = workspace.name
