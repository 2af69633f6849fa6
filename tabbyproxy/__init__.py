"""
tabbyproxy: run TabbyAPI models on demand behind one OpenAI- and Ollama-compatible endpoint.
"""

__version__ = "0.1.0"
