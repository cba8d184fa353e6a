"""Request -> harmony -> engine -> events -> wire format, one module per API."""
