"""pgmux.testing"""
