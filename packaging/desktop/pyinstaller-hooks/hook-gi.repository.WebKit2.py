# PyInstaller has no hook for WebKitGTK's bindings: pywebview's GTK backend imports WebKit2 4.1.
# Its typelib and library go into the bundle; its helper processes (WebKitWebProcess, WebKitNetworkProcess)
# are the system's own, so the bundle needs WebKitGTK 4.1 installed (Debian/Ubuntu: libwebkit2gtk-4.1-0).
from PyInstaller.utils.hooks.gi import GiModuleInfo

module_info = GiModuleInfo("WebKit2", "4.1")
if module_info.available:
    binaries, datas, hiddenimports = module_info.collect_typelib_data()
