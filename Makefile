# Everything runs from .venv, which these targets create: nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Dagster's PostgreSQL storage (SCIM_PIPELINE_POSTGRES_URL). Its release for dagster 1.13.28 (0.29.28) is not on the
# package index; 0.29.27 declares dagster==1.13.27 but runs on 1.13.28 (the PostgreSQL tests prove it), so it is
# installed without its dependencies (psycopg2-binary, the other one, is pinned in pyproject.toml). Move it into
# pyproject.toml's dependencies once the matching release exists.
DAGSTER_POSTGRES := dagster-postgres==0.29.27

.PHONY: install test demo dev bench fuzz clean

$(STAMP): Makefile pyproject.toml setup.py scim_pipeline/scalekit/_records.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps '$(DAGSTER_POSTGRES)'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest

# APP=scim2: a SCIM 2.0 application (scim2-server) instead of the demo application.
APP ?= demo

demo: $(STAMP)
	$(BIN)/scim-pipeline demo --app $(APP)

dev: $(STAMP)
	$(BIN)/scim-pipeline dev --app $(APP)

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

# Differential fuzzing of the C extension against the Python reference, under AddressSanitizer and UBSan, for
# FUZZ_SECONDS (too slow for `make test`, which runs a short seeded run against the normal build). The sanitized
# build, with edge coverage for the fuzzer, goes to build/fuzz and is loaded from there: the installed extension is
# left as it is. CPython leaks by design (detect_leaks=0), and PYTHONMALLOC=malloc hands
# the extension's buffers to the sanitizer instead of Python's own pools. Needs nothing `make install` does not: gcc
# ships the sanitizer runtimes.
FUZZ_SECONDS ?= 60
FUZZ_BUILD := build/fuzz
FUZZ_CFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1

fuzz: $(STAMP)
	mkdir -p $(FUZZ_BUILD)
	$(CC) -O2 -fPIC -c scim_pipeline_tests/scalekit/fuzz_coverage.c -o $(FUZZ_BUILD)/fuzz_coverage.o
	$(CC) $(FUZZ_CFLAGS) -fsanitize-coverage=trace-pc -fPIC -shared \
		-I"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
		scim_pipeline/scalekit/_records.c $(FUZZ_BUILD)/fuzz_coverage.o -o $(FUZZ_BUILD)/_records.so
	asan="$$($(CC) -print-file-name=libasan.so)"; \
	test -f "$$asan" || { echo "no AddressSanitizer runtime for $(CC)"; exit 1; }; \
	LD_PRELOAD="$$asan" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 PYTHONMALLOC=malloc \
		$(BIN)/python -m scim_pipeline_tests.scalekit.fuzz_records --extension $(FUZZ_BUILD)/_records.so \
		--seconds $(FUZZ_SECONDS) --artifacts $(FUZZ_BUILD) \
		|| { echo "make fuzz: see above. The input last run is $(FUZZ_BUILD)/last-input; to run it again:"; \
		     echo "  LD_PRELOAD=$$asan ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc $(BIN)/python -m" \
		          "scim_pipeline_tests.scalekit.fuzz_records --extension $(FUZZ_BUILD)/_records.so" \
		          "--replay $(FUZZ_BUILD)/last-input"; \
		     exit 1; }

clean:
	rm -rf $(VENV) .scim_pipeline $(FUZZ_BUILD)
