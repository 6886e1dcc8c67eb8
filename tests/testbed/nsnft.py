"""Run one nftables JSON batch in the current network namespace.

    ip netns exec NS python -m tests.testbed.nsnft < batch.json

Reads a JSON document ``{"nftables": [...]}`` from stdin and hands it to
libnftables (Debian's ``python3-nftables``) as one atomic transaction. Exit
status 0 on success; libnftables' error text on stderr otherwise. The testbed
uses it to switch the black hole inside a backend's namespace, so no nft
command line is ever assembled from strings.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import nftables

    batch = json.load(sys.stdin)
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, err = nft.json_cmd(batch)
    if out:
        sys.stdout.write(json.dumps(out))
    if rc != 0:
        sys.stderr.write(err or f"libnftables returned {rc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
