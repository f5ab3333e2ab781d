"""The API's HTTP layer: everything that knows about requests, responses and status codes.

`routes` (one module per resource), `deps` (request dependencies and the API key check), `edge` (what a
request meets before FastAPI reads it), `validation` (the 422 body), `schemas` (request bodies and
response models), `errors` (domain error → HTTP status and JSON body, the one place a status is chosen).
"""
