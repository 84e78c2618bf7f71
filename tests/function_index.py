"""Index a FunctionApp once per app object.

azure-functions 1.x's ``FunctionApp.get_functions()`` may be called only once per app: a second call
re-validates names against what the first call recorded and raises "does not have a unique
function name". The real worker indexes once; tests share this cached index instead.
"""

from __future__ import annotations

from typing import Any


def indexed_functions(app: Any) -> dict[str, Any]:
    cached = getattr(app, "_test_function_index", None)
    if cached is None:
        cached = {f.get_function_name(): f for f in app.get_functions()}
        app._test_function_index = cached
    return cached
