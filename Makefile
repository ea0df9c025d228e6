# Understudy: `make demo` and `make test` are the two commands (see README.md).
CARGO ?= cargo
GUEST_DIR := testbed/guest
GUEST_ELF := target/guest/understudy-guest

.PHONY: all deps guest build test test-quick demo bench bench-report fuzz clean lint

all: build guest

# Debian packages the tests use (QEMU as the peer VMM, memcached clients). Idempotent.
deps:
	testbed/scripts/install-deps.sh

guest: $(GUEST_ELF)

$(GUEST_ELF): $(shell find $(GUEST_DIR)/src $(GUEST_DIR)/Cargo.toml $(GUEST_DIR)/link.ld $(GUEST_DIR)/build.rs $(GUEST_DIR)/.cargo 2>/dev/null) $(shell find testbed/guest-kv/src 2>/dev/null)
	cd $(GUEST_DIR) && $(CARGO) build --release
	mkdir -p target/guest
	cp $(GUEST_DIR)/target/x86_64-unknown-linux-gnu/release/understudy-guest $(GUEST_ELF)

build:
	$(CARGO) build --release --workspace --all-targets

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

test: deps guest build
	$(CARGO) test --release --workspace --no-fail-fast

demo: deps guest
	$(CARGO) build --release -p understudy
	testbed/scripts/demo.sh

# Every benchmark (testbed/scripts/bench_run.py: transport, codecs, vm, protect, migrate-bench,
# faults, goals), results stored in docs/results/bench-<date>/ with the commit and the machine's load,
# then docs/benchmarks.md and its plots (docs/benchmarks/*.png) regenerated from them.
# BENCH_QUICK=1: fewer points, 3 runs each (~12 min here, ~24 with goals); the full campaign: ~90 min
# (estimated, goals included).
# BENCH_ONLY=protect,faults: some steps only (the report takes the others from older campaigns).
# BENCH_ONLY=goals: issue 16's goals only, `before` and `now` alternating in one run (the protect
# bench's kv, pause at ~1,000 pages and dirty at 10/5 ms with BENCH_VARIANTS; `testbed faults`
# kill.untuned with and without the inbound log, and the tuned kill points): ~20 min full,
# ~12 min quick (estimated; kv alone, quick: 96 s); BENCH_GOALS=kv,pause,... picks some goals.
# The report's first section then shows each goal before/now, met or not, with its command.
# Needs root and /dev/kvm. The benchmarks drive the release binaries: built first.
PYTHON3 ?= /usr/bin/python3
bench: deps guest
	$(CARGO) build --release -p understudy -p testbed
	$(PYTHON3) testbed/scripts/bench_run.py $(if $(BENCH_QUICK),--quick) $(if $(BENCH_ONLY),--only $(BENCH_ONLY)) $(if $(BENCH_GOALS),--goals $(BENCH_GOALS))

# Only regenerates docs/benchmarks.md and its plots from the newest docs/results/bench-*/ (~4 s).
bench-report:
	$(PYTHON3) testbed/scripts/bench_report.py

# Every cargo-fuzz target of every fuzz crate (each */fuzz/run.sh: replication-proto, vmm,
# transport, understudy, failover when present), FUZZ_SECONDS each; docs/fuzzing.md lists them.
fuzz:
	@status=0; for run in */fuzz/run.sh; do \
		$$run $(or $(FUZZ_SECONDS),60) || status=1; \
	done; exit $$status

clean:
	$(CARGO) clean
	rm -rf $(GUEST_DIR)/target
