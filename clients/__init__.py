"""ttsd clients: the asyncio client library and ttsd-say."""
