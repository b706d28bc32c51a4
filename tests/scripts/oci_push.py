#!/usr/bin/env python3
"""Pushes a one-blob OCI image to a registry (the Distribution API, as a
CI job's push does), with no credential of its own.

Usage: oci_push.py BASE_URL REPOSITORY TAG CA_FILE
Prints each step's status; on a refusal, the status and body, exit 1.
"""
import hashlib
import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

base, repository, tag, ca_file = sys.argv[1:5]
context = ssl.create_default_context(cafile=ca_file)


def send(method, url, body=None, kind=None):
    request = urllib.request.Request(url, data=body, method=method)
    if kind:
        request.add_header("Content-Type", kind)
    try:
        with urllib.request.urlopen(request, context=context) as answer:
            print(method, answer.status)
            return answer
    except urllib.error.HTTPError as refused:
        print(method, refused.code, refused.read().decode(errors="replace"))
        sys.exit(1)


config = json.dumps(
    {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
).encode()
digest = "sha256:" + hashlib.sha256(config).hexdigest()
started = send("POST", f"{base}/v2/{repository}/blobs/uploads/")
location = urllib.parse.urljoin(base, started.headers["Location"])
separator = "&" if "?" in location else "?"
send("PUT", f"{location}{separator}digest={digest}", config, "application/octet-stream")
manifest = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest,
            "size": len(config),
        },
        "layers": [],
    }
).encode()
kind = "application/vnd.oci.image.manifest.v1+json"
pushed = send("PUT", f"{base}/v2/{repository}/manifests/{tag}", manifest, kind)
print("pushed", pushed.headers["Docker-Content-Digest"])
