# CI build of llama-cpp-python for the oracle tests (tests/requirements.txt, .ci/run), included by CMake right after
# llama.cpp's own project() call: skip llama.cpp's "common" library (the CLI tools' helpers: argument parsing, chat
# parsers, an HTTP client: 53 of the 127 compile units left once the multimodal part is off). The Python package
# loads only libllama and libggml*; llama-cpp-python forces common ON for its multimodal part (LLAVA_BUILD).
set(LLAMA_BUILD_COMMON OFF)
