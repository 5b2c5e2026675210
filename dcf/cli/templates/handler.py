"""A DCF function. Load your model once in __init__; __call__ runs for every call.

req.input is the request body (bytes); req.json(), req.query, req.headers help.
Return a dict or list (sent as JSON), str, bytes, or dcf.Response(body, status, headers).
Raise dcf.HTTPError(400, "why") for bad input; any other exception becomes a 500.
"""

import dcf


class Handler:
    def __init__(self):
        # Runs once per replica, before it takes calls: load weights here.
        self.greeting = "hello"

    def __call__(self, req: dcf.Request):
        if not req.input:
            raise dcf.HTTPError(400, "empty body: send some text")
        return {"message": f"{self.greeting}, {req.input.decode(errors='replace').strip()}"}
