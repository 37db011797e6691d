# Written for the Go ETask v1.12: params in ETASK_ARGS_FILE, variables in ETASK_VARIABLES_FILE
# (a list of {"key", "value", "secret"}). Run unchanged by tests/runner.rs.
import json
import os


def load_json(env_name):
    with open(os.environ[env_name], encoding="utf-8") as file:
        return json.load(file)


args = load_json("ETASK_ARGS_FILE")
variables = {item["key"]: item["value"] for item in load_json("ETASK_VARIABLES_FILE")}
print("checking", args["host"], "as", variables["DB_USER"], "password", variables["DB_PASSWORD"])
print(os.environ["DB_PASSWORD"], flush=True)
with os.fdopen(int(os.environ["EWORK_RESULT_FD"]), "w") as out:
    json.dump({"host": args["host"], "user": variables["DB_USER"],
               "password_len": len(variables["DB_PASSWORD"])}, out)
