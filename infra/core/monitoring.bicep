// Log Analytics workspace + workspace-based Application Insights with local (key) authentication off:
// telemetry is accepted only with an Entra ID token (the app's managed identity holds Monitoring
// Metrics Publisher, see app/rbac.bicep; the app sets APPLICATIONINSIGHTS_AUTHENTICATION_STRING).
// One log alert: a message moved to a poison queue (the Functions host's "Message has reached
// MaxDequeueCount ... Moving message to queue '<name>-poison'" and the router's own "moving to poison").
// Storage's queue metrics are per account, not per queue, so a metric alert could not single out *-poison.

param workspaceName string
param appInsightsName string
param location string
param tags object = {}

@minValue(30)
@maxValue(730)
@description('Days Log Analytics keeps data.')
param retentionInDays int = 30

@description('E-mail address for the poison-queue alert; empty = no action group (the alert shows in the portal).')
param alertEmail string = ''

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

resource alertGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-${appInsightsName}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'emailrouter'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

resource poisonAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-poison-${appInsightsName}'
  location: location
  tags: tags
  properties: {
    displayName: 'Email Router: message moved to a poison queue'
    description: 'A queue message failed maxDequeueCount times and is in <queue>-poison. See emailrouter poison list and the PoisonLog table; replay with emailrouter poison replay.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: 'traces | where message contains "Moving message to queue" or message contains "moving to poison"'
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: empty(alertEmail) ? [] : [alertGroup.id]
    }
  }
}

output appInsightsName string = appInsights.name
// Not a credential: with DisableLocalAuth the instrumentation key alone cannot ingest telemetry.
output appInsightsConnectionString string = appInsights.properties.ConnectionString
output workspaceName string = workspace.name
