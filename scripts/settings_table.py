"""Print the README's configuration table from the settings class (paste it into README.md)."""

from worker.settings import Settings

print("| setting | default | meaning |")
print("|---|---|---|")
for name, field in Settings.model_fields.items():
    default = "" if field.default is None else f"`{field.default}`"
    print(f"| `CRMSYNC_{name.upper()}` | {default} | {field.description} |")
