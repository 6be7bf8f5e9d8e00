"""The audience language: AST (:mod:`.ast`), text and JSON forms, and the schema checker."""
