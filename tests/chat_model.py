"""A copy of a model folder with a chat template of our choosing, or with none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_chat_template(model_dir: Path, out: Path, template: str | None = CHAT_TEMPLATE) -> Path:
    """``model_dir`` copied to ``out``, its tokenizer's chat template replaced by ``template`` (None: no
    template at all)."""
    shutil.copytree(model_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # transformers reads this file before the config
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    if template is not None:
        (out / "chat_template.jinja").write_text(template)
    return out
