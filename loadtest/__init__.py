"""Load-test and benchmark harness for OpenAI-compatible servers (ours, vLLM, llama.cpp, LoRAX).

It talks HTTP only: `python -m loadtest run SCENARIO --base-url URL --out DIR`.
"""
