"""The gateway: one OpenAI- and Azure-compatible HTTP endpoint in front of every engine."""
