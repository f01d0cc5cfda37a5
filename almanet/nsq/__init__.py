"""NSQ TCP protocol V2: constants, errors, and (later) the asyncio client."""
