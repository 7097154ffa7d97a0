# stemforge. On a fresh Debian or Ubuntu machine:
#   make build PROFILE=debian-bookworm   # host packages, binary, image, boot + scan
#   make test                            # unit, integration and end-to-end tests
PROFILE ?= ubuntu-noble
OUT ?= out
ARGS ?=
TARGET := x86_64-unknown-linux-gnu
BIN := target/$(TARGET)/release/stemforge
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Host packages: bootstrap, chroot namespaces, file systems, images, QEMU.
APT_PACKAGES := mmdebstrap util-linux e2fsprogs dosfstools qemu-utils \
	qemu-system-x86 ovmf debian-archive-keyring ca-certificates gcc libc6-dev
# Ubuntu's archive key, where the host's archive has it (Ubuntu hosts).
APT_OPTIONAL := ubuntu-keyring

.PHONY: all deps binary build test bench clean

all: binary

deps:
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 2; }
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@for p in $(APT_OPTIONAL); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' && continue; \
		cand=$$(apt-cache policy $$p 2>/dev/null | awk '/Candidate:/ {print $$2}'); \
		if [ -n "$$cand" ] && [ "$$cand" != "(none)" ]; then \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$p; \
		fi; \
	done

# A static binary: the same file runs on the host and inside any image.
binary:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target $(TARGET)

build: deps binary
	$(SUDO) $(BIN) build --profile $(PROFILE) --out $(OUT) $(ARGS)

# End-to-end tests bootstrap real trees: they need root and the archive.
test: deps
	STEMFORGE_REQUIRE_E2E=$$([ "$$(id -u)" = 0 ] && echo 1 || echo 0) cargo test --locked

bench: deps binary
	$(SUDO) bench/run.sh $(PROFILE)

clean:
	cargo clean
	$(SUDO) rm -rf --one-file-system $(OUT) bench/out
