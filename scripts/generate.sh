#!/usr/bin/env bash
# Regenerates the Go code for every .proto under proto/ into api/gen with the pinned
# buf and plugins. With --check, fails if that changes anything committed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/tools.sh"
export PATH="$root/.bin:$PATH"
buf lint
buf format --diff --exit-code
buf generate
if [[ "${1:-}" == "--check" ]]; then
	if ! git diff --quiet -- api/gen || [[ -n "$(git ls-files --others --exclude-standard -- api/gen)" ]]; then
		echo "generated code in api/gen is stale: run scripts/generate.sh and commit the result" >&2
		git status --short -- api/gen >&2
		exit 1
	fi
	echo "generated code is up to date"
fi
