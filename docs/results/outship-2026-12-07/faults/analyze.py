import json, glob, sys, statistics
def pct(xs, p):
    xs = sorted(xs)
    if not xs: return float('nan')
    k = (len(xs)-1)*p/100
    f = int(k); c = min(f+1, len(xs)-1)
    return xs[f] + (xs[c]-xs[f])*(k-f)
groups = {}
for f in sorted(glob.glob('/tmp/outship-ab/*.json')):
    name = f.split('/')[-1][:-5]
    side, *rest = name.split('-')
    be = 'be' in rest
    d = json.load(open(f))
    for r in d['runs']:
        key = (('burst-end' if be else 'default'), r['point'], side)
        g = groups.setdefault(key, {'fo': [], 'pass': 0, 'n': 0, 'invalid': 0, 'files': set()})
        g['files'].add(name)
        g['n'] += 1
        if r['outcome'] == 'invalid': g['invalid'] += 1; continue
        if r['outcome'] == 'pass': g['pass'] += 1
        if r.get('failover_ms') is not None: g['fo'].append(r['failover_ms'])
print("| config | point | build | runs | pass | failover p50 ms | p90 ms | max ms | runs > 55 ms |")
print("|---|---|---|---|---|---|---|---|---|")
for key in sorted(groups):
    g = groups[key]; fo = g['fo']
    print("| %s | %s | %s | %d | %d | %.1f | %.1f | %.1f | %d |" % (key[0], key[1], key[2], g['n'], g['pass'], pct(fo,50), pct(fo,90), max(fo) if fo else float('nan'), sum(1 for x in fo if x > 55)))
