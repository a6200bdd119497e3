#!/usr/bin/env python3
"""Create a blob container in Azurite (the Azure Storage emulator) on
127.0.0.1: `create_azure_container.py PORT NAME`. object_store cannot create
containers, so the tests do it with one REST call signed with the
emulator's well-known account key (Shared Key authorization). Stdlib only."""
import base64
import hashlib
import hmac
import sys
import urllib.request
from email.utils import formatdate

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
VERSION = "2021-08-06"

port, container = sys.argv[1], sys.argv[2]
date = formatdate(usegmt=True)
# verb, then 11 standard headers (all empty here), canonical x-ms headers, canonical resource
string_to_sign = "\n".join(["PUT"] + [""] * 11 + [f"x-ms-date:{date}\nx-ms-version:{VERSION}", f"/{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"])
signature = base64.b64encode(hmac.new(base64.b64decode(KEY), string_to_sign.encode(), hashlib.sha256).digest()).decode()
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/{ACCOUNT}/{container}?restype=container",
    method="PUT",
    headers={"x-ms-date": date, "x-ms-version": VERSION, "Authorization": f"SharedKey {ACCOUNT}:{signature}", "Content-Length": "0"},
)
with urllib.request.urlopen(request) as r:
    assert r.status == 201, r.status
