"""Writes pycode_choice.jsonl: a small multiple-choice task over Python written for this repository (not copied
from anywhere): each item is the start of a line of Python and four endings, the first of which (in ITEMS) is the idiomatic one.
Run it to regenerate the data file; the items are the list below, in order."""

import json
from pathlib import Path

ITEMS = [
    ("import torch\nfrom torch import ", ["nn", "banana", "while", "42"], 0),
    ("class Block(nn.Module):\n    def __init__(self, config):\n        super().", ["__init__()", "forward()", "return", "import os"], 0),
    ("    def forward(self, hidden_states):\n        hidden_states = self.dense(", ["hidden_states)", "config)", "yield", "]"], 0),
    ("        self.dropout = nn.Dropout(config.", ["hidden_dropout_prob)", "vocab_size)", "import)", "class)"], 0),
    ("        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.", ["layer_norm_eps)", "vocab_size)", "num_labels)", "if)"], 0),
    ("for i in ", ["range(n):", "self.config", "= 0", "return"], 0),
    ("if __name__ == ", ["\"__main__\":", "None:", "self:", "[]:"], 0),
    ("        return ", ["hidden_states", "class", "def", "import"], 0),
    ("        attention_mask = attention_mask[:, None, None, ", [":]", "class]", "def]", "import]"], 0),
    ("logger = logging.get_", ["logger(__name__)", "tensor(__name__)", "dropout(__name__)", "while(__name__)"], 0),
    ("        batch_size, seq_length = input_ids.", ["shape", "append", "items", "keys"], 0),
    ("    @property\n    def ", ["dummy_inputs(self):", "import torch", "return None", "class A"], 0),
    ("        self.query = nn.Linear(config.hidden_size, self.all_head_", ["size)", "label)", "while)", "import)"], 0),
    ("        attention_probs = nn.functional.softmax(attention_scores, dim=", ["-1)", "\"a\")", "None None)", "class)"], 0),
    ("        outputs = (context_layer, attention_probs) if output_attentions else (", ["context_layer,)", "import,)", "class,)", "while,)"], 0),
    ("    def __init__(self, config", ["):", "]:", "}:", "+"], 0),
    ("        if attention_mask is not ", ["None:", "True:", "self:", "import:"], 0),
    ("from typing import Optional, ", ["Union", "torch", "forward", "self"], 0),
    ("    model_type = ", ["\"bert\"", "None(", "import", "[["], 0),
    ("        self.num_attention_heads = config.num_attention_", ["heads", "labels", "layers_norm", "vocab"], 0),
    ("            raise ValueError(", ["f\"", "return", "import", "class"], 0),
    ("        hidden_states = self.LayerNorm(hidden_states + ", ["input_tensor)", "import)", "class)", "while)"], 0),
    ("        loss_fct = ", ["CrossEntropyLoss()", "import torch", "class Loss", "while True"], 0),
    ("    _no_split_modules = [", ["\"", "1", "None", "self"], 0),
    ("        position_ids = torch.arange(", ["seq_length", "class", "import", "yield"], 0),
    ("            nn.init.", ["normal_(", "import(", "class(", "while("], 0),
    ("        self.embed_tokens = nn.Embedding(config.vocab_size, config.", ["hidden_size", "num_labels", "dropout", "is_decoder"], 0),
    ("    def get_input_", ["embeddings(self):", "class(self):", "import(self):", "while(self):"], 0),
    ("        all_hidden_states = () if output_hidden_states else ", ["None", "class", "import", "while"], 0),
    ("        if not return_dict:\n            return ", ["tuple(", "class(", "import(", "while("], 0),
    ("        key_states = self.k_proj(hidden_states).view(", ["hidden_shape)", "class)", "import)", "while)"], 0),
    ("        self.act_fn = ACT2FN[config.", ["hidden_act]", "vocab_size]", "num_labels]", "pad_token_id]"], 0),
    ("        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.", ["up_proj(x))", "import(x))", "class(x))", "while(x))"], 0),
    ("    config_class = ", ["BertConfig", "import", "while", "None("], 0),
    ("        with torch.", ["no_grad():", "import():", "class():", "while():"], 0),
    ("        self.post_init", ["()", "[]", "{}", "::"], 0),
    ("        residual = ", ["hidden_states", "import", "class", "yield"], 0),
    ("    def _init_weights(self, ", ["module):", "import):", "class):", "while):"], 0),
    ("        logits = self.lm_head(", ["hidden_states", "import", "class", "while"], 0),
    ("        return BaseModelOutput(\n            last_hidden_state=", ["hidden_states,", "import,", "class,", "while,"], 0),
]


def main() -> None:
    out = Path(__file__).with_name("pycode_choice.jsonl")
    with open(out, "w", encoding="utf-8") as fh:
        for i, (context, choices, gold) in enumerate(ITEMS):
            k = i % len(choices)  # the right ending sits at every position in turn (ties cannot favour one)
            rotated = choices[k:] + choices[:k]
            fh.write(json.dumps({"context": context, "choices": rotated, "gold": (gold - k) % len(choices)}) + "\n")


if __name__ == "__main__":
    main()
