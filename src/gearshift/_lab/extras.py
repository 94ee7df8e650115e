"""Claims that need optional tools: Cython and a C compiler, aiofiles, HTTP clients."""
