"""Model wrappers: `NNsight` for any torch module (and, later, `LanguageModel`)."""
