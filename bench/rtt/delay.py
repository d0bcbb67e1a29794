# A TCP proxy that delays every chunk by DELAY seconds in each direction (order kept),
# so a round trip through it costs 2 * DELAY.
import asyncio, sys, time
listen, target, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
async def pump(reader, writer):
    q = asyncio.Queue()
    async def read():
        while True:
            data = await reader.read(65536)
            await q.put((time.monotonic() + delay, data))
            if not data: return
    async def write():
        while True:
            due, data = await q.get()
            now = time.monotonic()
            if due > now: await asyncio.sleep(due - now)
            if not data:
                try: writer.write_eof()
                except Exception: pass
                return
            writer.write(data); await writer.drain()
    try: await asyncio.gather(read(), write())
    except Exception: pass
    finally:
        try: writer.close()
        except Exception: pass
async def handle(r, w):
    try: ur, uw = await asyncio.open_connection('127.0.0.1', target)
    except Exception: w.close(); return
    await asyncio.gather(pump(r, uw), pump(ur, w))
async def main():
    s = await asyncio.start_server(handle, '127.0.0.1', listen)
    async with s: await s.serve_forever()
asyncio.run(main())
