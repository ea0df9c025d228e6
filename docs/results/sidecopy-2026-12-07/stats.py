import json,glob,math
def pct(xs,p):
    xs=sorted(xs); k=(len(xs)-1)*p/100; f=math.floor(k); c=math.ceil(k)
    return xs[f]+(xs[c]-xs[f])*(k-f)
for rounds in [(1,2),(1,2,3,4,5,6)]:
    for which in ['new','main']:
        fs=[];rep=0
        for r_ in rounds:
            for r in json.load(open(f'docs/results/sidecopy-2026-12-07/sidecopy-ab-{which}-{r_}.json'))['runs']:
                fs.append(r['failover_ms']); rep+= r['replayed_frames']>0
        print(rounds, which, len(fs), 'p50 %.1f p90 %.1f p99 %.1f max %.1f'%(pct(fs,50),pct(fs,90),pct(fs,99),max(fs)), '>=200: %d'%sum(x>=200 for x in fs), 'replayed %d'%rep)
