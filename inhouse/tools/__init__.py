"""The model's built-in tools, run in-house: `python` in a bubblewrap sandbox (`python.py`,
`sandbox.py`) and `browser` over the organisation's own document index (`documents.py`,
`browser.py`). Nothing here touches the network."""
