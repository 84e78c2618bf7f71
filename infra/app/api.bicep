// Flex Consumption plan (FC1, Linux) and the Function App (Python 3.11) running as the user-assigned
// identity. App settings live in app/appsettings.bicep so they are applied after the role assignments.
//
// Flex Consumption rejects or ignores many classic site properties and app settings (Learn: "Flex
// Consumption plan deprecations"): no ftpsState, alwaysOn, linuxFxVersion, use32BitWorkerProcess,
// functionAppScaleLimit, preWarmedInstanceCount, vnet*Enabled ... in siteConfig, and no
// FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION, WEBSITE_RUN_FROM_PACKAGE, WEBSITE_CONTENT*,
// SCM_DO_BUILD_DURING_DEPLOYMENT, ENABLE_ORYX_BUILD ... app settings: runtime, scale and deployment are
// in functionAppConfig. tests/unit/test_infra.py lists them all and fails on any.

param name string
param planName string
param location string
param tags object = {}

@description('azd service name (azure.yaml); azd finds the app by this tag.')
param serviceName string = 'api'

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Blob endpoint of the storage account, e.g. https://st....blob.core.windows.net/')
param deploymentStorageBlobEndpoint string

param deploymentContainerName string

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 9

@minValue(0)
@description('Always-ready instances of the HTTP scale group (the Graph webhooks): no cold start within Graph\'s deadlines.')
param httpAlwaysReady int = 1

// 3.12 is supported by Flex Consumption; stay on 3.11 until remote builds run on the selected version
// (Azure/azure-dev#8538: the remote build used Python 3.11.8 whatever runtime.version said).
@allowed([
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': serviceName })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${deploymentStorageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
        alwaysReady: httpAlwaysReady > 0
          ? [
              {
                name: 'http'
                instanceCount: httpAlwaysReady
              }
            ]
          : []
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

output name string = functionApp.name
output id string = functionApp.id
output defaultHostName string = functionApp.properties.defaultHostName
output planName string = plan.name
