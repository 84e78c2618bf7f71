"""Azure Functions entry point: registers the blueprints in functions/ and nothing else.

No configuration is read and no client is built here: an exception at import time would make the
host index no functions at all (azure-functions-python-worker#1338).
"""

import azure.functions as func

from functions import (
    graph_webhooks,
    health,
    inbound_functions,
    outbound_functions,
    settings_functions,
    status_page,
)

app = func.FunctionApp()
app.register_functions(health.bp)
app.register_functions(graph_webhooks.bp)
app.register_functions(settings_functions.bp)
app.register_functions(inbound_functions.bp)
app.register_functions(outbound_functions.bp)
app.register_functions(status_page.bp)
