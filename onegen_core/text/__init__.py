"""How text becomes tokens and back: prompts, chats, documents, queries and passages (``rendering``),
role-labelled training conversations (``conversation``), corpus and ``db.jsonl`` entries and their units
(``documents``), and streamed output text (``detokenizer``)."""
