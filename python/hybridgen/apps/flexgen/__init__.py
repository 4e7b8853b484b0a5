"""``python -m hybridgen.flexgen``: FlexGen's ``flex_opt`` command line with hybrid attention
(:mod:`.cli`), its hybrid options (:mod:`.options`) and the offline tokenizer stand-in
(:mod:`.tokenizer`). The FlexGen adapter itself is :mod:`hybridgen.flexgen`."""
