import sys, time, random, json, statistics
from pymemcache.client.base import Client
host, n, think_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
random.seed(7)
c = Client((host, 11211), connect_timeout=10, timeout=10, no_delay=True, default_noreply=False)
c.set("warm", b"x")
val = b"v" * 100
lat = []
for i in range(n):
    if think_ms > 0:
        time.sleep(random.uniform(0, think_ms / 1000.0))
    k = "lat%d" % (i // 2)
    t0 = time.perf_counter()
    if i % 2 == 0:
        c.set(k, val)
    else:
        c.get(k)
    lat.append((time.perf_counter() - t0) * 1e6)
c.close()
lat.sort()
print("p50=%.0f p90=%.0f" % (lat[len(lat)//2], lat[int(len(lat)*0.9)]))
