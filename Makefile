# Conveniences; each target is the same command the README gives.
.PHONY: test up
test:
	scripts/test
up:
	scripts/up
