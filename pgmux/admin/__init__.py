"""pgmux.admin"""
