"""pgmux.protocol"""
