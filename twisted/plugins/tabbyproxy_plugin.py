from twisted.application.service import ServiceMaker

tabbyproxy = ServiceMaker(
    "tabbyproxy",
    "tabbyproxy.tap",
    "Run TabbyAPI models on demand behind an OpenAI- and Ollama-compatible endpoint",
    "tabbyproxy",
)
