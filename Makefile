# Conveniences; each target is the same command the README gives.
.PHONY: test up e2e-vm
test:
	scripts/test
up:
	scripts/up
e2e-vm:
	scripts/vm-e2e
