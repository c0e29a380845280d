# Thin wrapper over CMake. `make run` and `make test` are the two commands a
# newcomer needs; both install what is missing first (scripts/deps.sh).
JOBS      ?= $(shell nproc)
PY        := /usr/bin/python3
RELEASE   := build/release
ASAN      := build/asan
FUZZDIR   := build/fuzz
FUZZ_TIME ?= 60
ARGS      ?=

.PHONY: all deps build build-asan build-fuzz run test unit integration fuzz clean

all: build

deps:
	@scripts/deps.sh

build: deps
	@cmake -S . -B $(RELEASE) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(RELEASE) -j $(JOBS)

build-asan: deps
	@cmake -S . -B $(ASAN) -DCMAKE_BUILD_TYPE=Debug -DARQ_SANITIZE=ON >/dev/null
	@cmake --build $(ASAN) -j $(JOBS)

build-fuzz: deps
	@CC=clang cmake -S . -B $(FUZZDIR) -DCMAKE_BUILD_TYPE=Debug -DARQ_FUZZ=ON >/dev/null
	@cmake --build $(FUZZDIR) -j $(JOBS)

# Starts the server in the foreground on the in-memory default.
run: build
	$(RELEASE)/arqonbus $(ARGS)

# Release and ASan+UBSan builds, unit and integration tests on both, and a
# short fuzzing run of every target. Ends with each runner's summary line.
test: deps
	@scripts/test.sh

unit: build
	@cd $(RELEASE) && ctest --output-on-failure

integration: build
	@ARQONBUS_BIN=$(CURDIR)/$(RELEASE)/arqonbus $(PY) -m pytest -q tests/integration

# Runs every fuzz target for FUZZ_TIME seconds each.
fuzz: build-fuzz
	@scripts/fuzz.sh $(FUZZ_TIME)

clean:
	rm -rf build
