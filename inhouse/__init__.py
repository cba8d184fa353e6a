"""inhouse: run OpenAI's open-weight gpt-oss models on your own hardware."""

__version__ = "0.1.0"
