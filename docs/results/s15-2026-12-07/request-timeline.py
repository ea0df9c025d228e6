"""Where one request's time goes under protection, from the primary's debug log.

Events (all with wall_ns): `rx frame delivered` and `output held` (each with the frame's TCP
flow sport:dport:payload), `pause begin`/`pause end`, `acked and released`, and the vCPU's
`mmio read`/`mmio write` (trace). A request is a frame to port 11211 with payload; its reply is
the next payload frame from 11211 to the same client port; the reply leaves when its epoch is
acked and released. Usage: python3 request-timeline.py primary.log"""
import re, sys, bisect, collections

strip = lambda s: re.sub(r'\x1b\[[0-9;]*m', '', s)
NAMES = ['rx frame delivered', 'output held', 'pause begin', 'pause end', 'acked and released', 'mmio read']
ev = []
for line in open(sys.argv[1]):
    line = strip(line)
    kv = dict(re.findall(r'(\w+)=(\S+)', line))
    if 'wall_ns' not in kv:
        continue
    for n in NAMES:
        if n in line:
            ev.append((int(kv['wall_ns']) / 1000, n, kv))
            break
ev.sort(key=lambda e: e[0])
released = {int(kv['seq']): t for t, n, kv in ev if n == 'acked and released'}
pause_b = {int(kv['seq']): t for t, n, kv in ev if n == 'pause begin'}
pause_e = {int(kv['seq']): t for t, n, kv in ev if n == 'pause end'}
pb = sorted(pause_b.values()); pe = sorted(pause_e.values())
isr = [t for t, n, kv in ev if n == 'mmio read' and kv.get('addr') == str(0xd0000060)]
waiting, rows = {}, []
for t, n, kv in ev:
    flow = kv.get('flow', '-').strip('"')
    if flow == '-':
        continue
    sp, dp, pl = map(int, flow.split(':'))
    if n == 'rx frame delivered' and dp == 11211 and pl > 0:
        waiting[sp] = t
    elif n == 'output held' and sp == 11211 and pl > 0 and dp in waiting:
        q = waiting.pop(dp)
        e = int(kv['epoch'])
        if e in released and e in pause_b and e in pause_e:
            rows.append((q, t, e))
rows = rows[len(rows) // 5: -(len(rows) // 10) or None]  # steady state


def paused(a, b):
    s = 0.0
    for j in range(max(0, bisect.bisect_left(pb, a) - 1), len(pb)):
        if pb[j] > b:
            break
        s += max(0.0, min(b, pe[j]) - max(a, pb[j]))
    return s


def show(name, v):
    v = sorted(v)
    n = len(v)
    print('%-38s p10 %5.0f p50 %5.0f p90 %5.0f mean %5.0f' % (name, v[n // 10], v[n // 2], v[9 * n // 10], sum(v) / n))


print('requests', len(rows))
show('request delivered -> reply held', [h - q for q, h, e in rows])
show('  of it the vCPU paused', [paused(q, h) for q, h, e in rows])
woke = [(q, h, isr[bisect.bisect_left(isr, q)]) for q, h, e in rows
        if bisect.bisect_left(isr, q) < len(isr) and isr[bisect.bisect_left(isr, q)] < h]
if woke:
    print('  guest halted when the request came: %.0f%%' % (100 * len(woke) / len(rows)))
    show('    delivered -> interrupt taken', [w - q for q, h, w in woke])
    show('    interrupt taken -> reply held', [h - w for q, h, w in woke])
show('reply held -> its epoch pauses', [pause_b[e] - h for q, h, e in rows])
show('its pause', [pause_e[e] - pause_b[e] for q, h, e in rows])
show('pause end -> acked and released', [released[e] - pause_e[e] for q, h, e in rows])
show('request delivered -> reply released', [released[e] - q for q, h, e in rows])
# How the connections move: requests delivered per ~cycle, as runs of requests with < 300 us gaps.
qs = sorted(q for q, h, e in rows)
runs, cur = [], 1
for a, b in zip(qs, qs[1:]):
    if b - a < 300:
        cur += 1
    else:
        runs.append(cur)
        cur = 1
print('requests per wave (arrivals < 300 us apart): mean %.1f, waves %d' % (sum(runs) / len(runs), len(runs)))
