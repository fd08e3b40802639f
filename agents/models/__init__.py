"""Policy networks behind one interface: our transformer, Hugging Face LMs, SB3 extractors."""
