"""The model store from Python: what is installed, what the catalog offers, the default."""

import openweight

for m in openweight.list_models():
    flag = "installed" if m.installed else "catalog"
    print(f"{m.name:32} {flag:10} {m.family or '-':12} {'(default)' if m.default else ''}")
print("default:", openweight.default_model())
info = openweight.model_info(openweight.default_model())
print("hub id of the default:", info.get("hub_id"))
