"""The ttsd daemon: WebSocket, HTTP and Wyoming servers around one pipeline worker."""
