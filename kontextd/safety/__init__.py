"""The safety checker: an offline NSFW classifier on every image the local model makes
(kontextd.safety.checker), configured by the TOML config's `[safety]` section (kontextd.safety.config)."""
