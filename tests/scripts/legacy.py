# Written for the ECMDB-era Go ETask (<= v0.0.7): sys.argv[1] is the params JSON, sys.argv[2]
# the variables JSON. Run unchanged by tests/runner.rs with argv_style "legacy".
import json
import os
import sys

params = json.loads(sys.argv[1])
variables = {v["key"]: v["value"] for v in json.loads(sys.argv[2])}
print("checking", params["host"], "as", variables["DB_USER"], "password", variables["DB_PASSWORD"])
print(os.environ["DB_PASSWORD"], file=sys.stderr)
with os.fdopen(int(os.environ["EWORK_RESULT_FD"]), "w") as out:
    json.dump({"host": params["host"], "user": variables["DB_USER"],
               "password_len": len(variables["DB_PASSWORD"])}, out)
