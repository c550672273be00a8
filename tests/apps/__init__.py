"""Small WSGI/ASGI apps, server configurations and a server harness for the tests
that run Vela under real gunicorn and uvicorn processes."""
