# stemforge. On a fresh Debian or Ubuntu machine:
#   make build PROFILE=debian-bookworm   # host packages, binary, image, boot + scan
#   make test                            # unit, integration and end-to-end tests
PROFILE ?= ubuntu-noble
OUT ?= out
ARGS ?=
TARGET := x86_64-unknown-linux-gnu
BIN := target/$(TARGET)/release/stemforge
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Host packages: scripts/host-tools.tsv names every tool and file with its
# package; scripts/host-deps.sh installs them in one apt run (QEMU at one
# version) and checks them all again. Python validators for the tests go
# into a virtualenv, pinned by scripts/validators.txt.
VALIDATORS := target/validators

.PHONY: all deps binary build test bench clean

all: binary

deps:
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 2; }
	@bash scripts/host-deps.sh
	@if [ ! -x $(VALIDATORS)/bin/pyspdxtools ] || ! cmp -s scripts/validators.txt $(VALIDATORS)/requirements.txt; then \
		echo "installing the validators into $(VALIDATORS)"; \
		python3 -m venv $(VALIDATORS) && \
		$(VALIDATORS)/bin/pip install -q -r scripts/validators.txt && \
		cp scripts/validators.txt $(VALIDATORS)/requirements.txt; \
	fi

# A static binary: the same file runs on the host and inside any image.
binary:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target $(TARGET)

build: deps binary
	$(SUDO) $(BIN) build --profile $(PROFILE) --out $(OUT) $(ARGS)

# Tests that need root and the archive (end to end: bootstraps, builds,
# boots) or the validators are #[ignore]d with their reason; as root, they
# all run after the rest.
test: deps
	cargo test --locked
	@if [ "$$(id -u)" = 0 ]; then \
		cargo test --locked --no-fail-fast -- --ignored; \
	else \
		echo "not root: the #[ignore]d tests (root, archive, validators) did not run; run make test as root" >&2; \
	fi

bench: deps binary
	$(SUDO) bench/run.sh $(PROFILE)

clean:
	cargo clean
	$(SUDO) rm -rf --one-file-system $(OUT) bench/out
